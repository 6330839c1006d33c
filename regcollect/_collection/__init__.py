"""The collection: entries, their registration, activity penalties, evaluation."""
