"""Quality: the shapes world the tiny models learn and are judged on."""
