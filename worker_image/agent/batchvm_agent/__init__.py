"""The worker agent baked into the batch VM image.

It runs exactly one job on the VM that was created for it, then powers the VM off:

1. read its binding (job id, attempt, subscription, status topic, container settings) from the
   instance metadata server (:mod:`.metadata`);
2. pull its own job message and hold its lease while the job runs (:mod:`.jobsource`);
3. run the job's container through a docker-compatible CLI, no shell involved (:mod:`.container`);
4. report STARTED, RUNNING heartbeats and a terminal status on the status topic (:mod:`.status`);
5. ack the job message only once the terminal status is published, then power off (:mod:`.main`).

It never imports Airflow: the VM has only google-cloud-pubsub, pydantic and ``airflow_batchvm.wire``
(``airflow-batchvm`` installed with ``--no-deps``).
"""

__version__ = "0.1.0"
