echo "uptime: $(cut -d' ' -f1 /proc/uptime 2>/dev/null || echo unknown) s"
