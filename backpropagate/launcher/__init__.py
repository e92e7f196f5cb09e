"""`backprop ui`: check the flags, build the front end once, then run the production server.

Order of a launch: refuse unsafe flags → (share tunnel) → launch file → build if the sources
changed → start the server in its own process group → wait for it → print the URL → on
Ctrl-C / SIGTERM stop everything and remove the launch file.
"""

from __future__ import annotations

from backpropagate.launcher.run import LaunchOptions, launch

__all__ = ["LaunchOptions", "launch"]
