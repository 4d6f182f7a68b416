"""Storage: one interface, an SQLite and a PostgreSQL implementation."""
