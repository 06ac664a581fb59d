"""The simulated phones: the device table, availability schedules, job timing and dropout.

Plain numpy over columns; nothing here knows of Ray, the round or what is trained.
"""
