"""Model classes: one per shape, variants by config flags."""
