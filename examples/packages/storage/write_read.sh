f=$(mktemp)
head -c 65536 /dev/urandom > "$f"
a=$(sha256sum < "$f"); cp "$f" "$f.copy"; b=$(sha256sum < "$f.copy")
rm -f "$f" "$f.copy"
echo "write/read of 64 KiB: $a"
[ "$a" = "$b" ]
