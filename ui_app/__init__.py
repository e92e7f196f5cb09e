"""The Backpropagate web app (Reflex). Start it with `backprop ui`, never directly."""
