"""Azure ML: workspace, pipeline building and submission, schedules, job status and logs, and the helpers the
components run inside their jobs.

Every module here imports `azure.ai.ml` inside its functions, so importing the package costs nothing and
`azdistill --help` stays instant.
"""
