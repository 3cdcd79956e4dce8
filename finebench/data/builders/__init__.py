"""One module per dataset family; each turns an official raw layout into a ``ParsedDataset``."""
