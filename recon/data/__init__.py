"""Training and test data made offline from data that installed packages ship (docs/DESIGN.md section 7)."""
