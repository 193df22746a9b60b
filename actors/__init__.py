"""Thin Ray actors hosting rtb_ray library objects (no math here)."""
