"""Process level of Stanch: settings, topics, the Faust app, CLI, broker, sidecar."""
