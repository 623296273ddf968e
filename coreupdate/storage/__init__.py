"""Storage: the schema, its migrations and the queries, on SQLite (embedded default) or PostgreSQL.

One code path for both databases: SQLAlchemy Core in the 2.0 style, which runs on Debian bookworm's 1.4 and on
current releases.  Everything here is synchronous; the server calls it from worker threads.
"""
