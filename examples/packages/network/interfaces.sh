ls /sys/class/net 2>/dev/null | sed 's/^/interface: /'
true
