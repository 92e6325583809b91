"""Container-ready jobs (training job: :mod:`models.jobs.train_job`)."""
