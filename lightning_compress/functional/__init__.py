"""Pure torch (+ tensorly) functions that decide how to compress. No Lightning imports here."""
