"""The math floor: pure functions of tensors, the bridge and small value objects (runs,
activations, targets, edits). No HTTP errors, no session."""
