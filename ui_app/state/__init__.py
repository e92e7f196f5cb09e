"""What the pages share: the service door, the run view over events, the header state."""
