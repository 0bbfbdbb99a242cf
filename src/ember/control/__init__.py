"""The live control plane: jobs, pools of workers, the autoscaler loop, persistence calls."""
