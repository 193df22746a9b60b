"""Thin Ray actors hosting rtb_ray library objects (no math here). A process that joins a run's
Ray calls ``actors.session.prepare_ray`` before it imports Ray (the CLI does)."""
