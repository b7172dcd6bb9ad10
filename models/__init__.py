"""Pure torch models of ExFM (FM teacher, VM students, heads, losses, metrics): no I/O here."""
