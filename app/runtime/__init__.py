"""What runs beside requests, and the container that builds it.

container.py is the composition root: it builds every long-lived object once (database
engine, model loader, job queue, the job environment) and the API (app/main.py), the Celery
worker (workers/celery_app.py) and the CLI (app/cli) each ask it. Beside it: the embedded job
runner (runner.py), the reconciler that re-queues lost jobs (reconciler.py), the folder-library
monitor (library_monitor.py), the CPU priority of job threads (priority.py) and the supervisor
of several API processes (supervisor.py).
"""
