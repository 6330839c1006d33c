"""The optimizer side: penalties applied in the step, wrappers, schedules' clock."""
