"""A real Airflow notifier for the alarm tests: appends what it was told to a file."""

import json

from airflow.sdk.bases.notifier import BaseNotifier


class FileNotifier(BaseNotifier):
    template_fields = ("message",)

    def __init__(self, path: str, message: str = "{{ ti.task_id }} failed on {{ ds }}"):
        super().__init__()
        self.path, self.message = path, message

    def notify(self, context) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"message": self.message, "error": str(context.get("exception"))}) + "\n")
