"""The Ray cluster under every command: joining or starting it and ending what was started (`connect`), the Serve
front door of a local cluster (`ingress`), whether a job fits its nodes (`resources`), waiting for an autoscaling
cluster to grow (`autoscaler`), and the processes and ports of this machine (`processes`, via psutil)."""
