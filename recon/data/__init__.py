"""Training and test data made offline from data that installed packages ship (DESIGN.md section 7)."""
