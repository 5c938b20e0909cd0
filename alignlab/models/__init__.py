"""Loading, the embedded tiny model, the frozen reference and export."""
