"""What a task is: its config (the one home of every setting), its data, model and metrics,
and the one training loop both tasks share. Runs centralized or inside a site; knows no FLARE."""
