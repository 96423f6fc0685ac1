"""The stages of one job: plan the job, calibrate, the layer loop (read -> quantize -> write),
assemble and publish the export, the report; the job directory and the user's files."""
