"""Keeping secrets out of answers and logs: leak guard, literal prefilter, log scrubbing."""
