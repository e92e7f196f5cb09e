"""Reusable pieces of the pages: layout, charts, panels, chat bubbles, status badges."""
