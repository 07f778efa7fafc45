"""The running process over time: state, reload, file watch, drain, workers."""
