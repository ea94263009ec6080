"""The command line: `polar` (app/cli/main.py: admin commands on the server's database, and the
HTTP client commands), the HTTP client it and the demo use (http.py) and their progress display
(progress.py). `python -m app.cli` runs it."""
