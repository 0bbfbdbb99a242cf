"""The live control plane: rooms that each own one kind of state, wired by `plane.ControlPlane`."""
