echo "checking the device booted"
grep -q "OTS demo image" device.img && echo "image signature found"
