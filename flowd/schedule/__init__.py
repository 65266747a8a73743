"""APScheduler, built only once a routine has a schedule, and the schedule expressions."""
