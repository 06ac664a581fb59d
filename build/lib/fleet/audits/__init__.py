"""Audits run after training: memorization (canaries), participation under real availability,
and the dropout stress page."""
