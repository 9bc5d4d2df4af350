"""Task synthesis: task programs (verifiable tasks generated with their gold answers)."""
