"""LightningFT."""
