"""FR networks of the zoo, one module per source; each registers itself in faceshield.models.registry."""
