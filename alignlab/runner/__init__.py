"""Run plumbing: config checks, hardware profiles, loggers, resume, sweeps, redaction and the
checks that run before Hydra starts."""
