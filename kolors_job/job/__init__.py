"""One run of a job: its context, its exclusive claim on the output prefix, status.json, scratch directories."""
