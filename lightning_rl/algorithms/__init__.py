"""Algorithm math as small pure functions on tensors."""
