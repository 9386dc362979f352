"""The training pipeline: plain step functions (``spec``, ``network``, ``data``, ``jobs``,
``results``) and their wiring into Airflow tasks (``graph``)."""
