#!/usr/bin/env bash
# Example conductor: what a real one does with a device, done with files so a
# newcomer can run it without hardware.
#
#   conductor.sh --image file://PATH|PATH --packages a,b --results DIR
#
# 1. "flashes" the image: only a file below the images folder
#    (OTS_EXAMPLE_IMAGES, default: the images/ folder next to this script) —
#    a testrun must not make the worker host read and report any file it
#    can see — copied into the working folder;
# 2. runs each test package: every executable *.sh in packages/<name>/ is one
#    test case (exit 0 = pass), its output streamed line by line;
# 3. writes one JUnit XML file per package into the results folder.
#
# Exit status (the convention ots-worker reports and ots-server judges):
#   0  tests ran (verdict from the JUnit files)
#   1  tests ran and some failed
#   3  flashing failed (device/infrastructure error)
#   64 bad arguments
set -u

image="" packages="" results=""
while [ $# -gt 0 ]; do
    case "$1" in
        --image) image=$2; shift 2 ;;
        --packages) packages=$2; shift 2 ;;
        --results) results=$2; shift 2 ;;
        *) echo "conductor: unknown argument $1" >&2; exit 64 ;;
    esac
done
[ -n "$image" ] && [ -n "$packages" ] && [ -n "$results" ] || {
    echo "conductor: need --image, --packages and --results" >&2; exit 64; }

here=$(cd "$(dirname "$0")" && pwd)
packages_dir=${OTS_EXAMPLE_PACKAGES:-$here/packages}

images_dir=$(cd "${OTS_EXAMPLE_IMAGES:-$here/images}" 2>/dev/null && pwd -P) || {
    echo "[flash] FAILED: the images folder ${OTS_EXAMPLE_IMAGES:-$here/images} does not exist (set OTS_EXAMPLE_IMAGES)" >&2
    exit 3
}
case "$image" in
    *://*) [ "${image#file://}" != "$image" ] || {
        echo "[flash] refused: only file:// images below $images_dir are taken, not $image" >&2; exit 64; } ;;
esac
path=${image#file://}
echo "[flash] image $image"
if [ ! -f "$path" ]; then
    echo "[flash] FAILED: image $path not found" >&2
    exit 3
fi
real=$(realpath -e -- "$path")
case "$real" in
    "$images_dir"/*) ;;
    *) echo "[flash] refused: image $path is not below the images folder $images_dir (OTS_EXAMPLE_IMAGES)" >&2; exit 64 ;;
esac
cp "$path" ./device.img
echo "[flash] flashed $(wc -c < ./device.img) bytes, sha256 $(sha256sum ./device.img | cut -d' ' -f1)"
echo "[boot] device is up"

xml_escape() { sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g' -e 's/"/\&quot;/g'; }

mkdir -p "$results"
any_failed=0
IFS=',' read -r -a list <<< "$packages"
for pkg in "${list[@]}"; do
    dir=$packages_dir/$pkg
    cases="" tests=0 failures=0
    # The dashboard's log viewer folds what lies between these lines.
    echo "::group::package $pkg"
    if [ ! -d "$dir" ]; then
        echo "[$pkg] package not found in $packages_dir" >&2
        cases="<testcase classname=\"$pkg\" name=\"package-present\"><failure message=\"package $pkg not found\"/></testcase>"
        tests=1 failures=1 any_failed=1
    else
        for t in "$dir"/*.sh; do
            [ -e "$t" ] || continue
            name=$(basename "$t" .sh)
            out=$(mktemp)
            start=$(date +%s%N)
            echo "::group::$pkg/$name"
            bash "$t" 2>&1 | tee "$out" | sed -u "s|^|[$pkg/$name] |"
            rc=${PIPESTATUS[0]}
            echo "::endgroup::"
            secs=$(( ($(date +%s%N) - start) / 1000000 ))
            tests=$((tests + 1))
            body="<system-out>$(xml_escape < "$out")</system-out>"
            if [ "$rc" -ne 0 ]; then
                failures=$((failures + 1)); any_failed=1
                body="<failure message=\"exit status $rc\"/>$body"
                echo "[$pkg/$name] FAIL (exit $rc)"
            else
                echo "[$pkg/$name] PASS"
            fi
            cases="$cases<testcase classname=\"$pkg\" name=\"$name\" time=\"$((secs / 1000)).$(printf %03d $((secs % 1000)))\">$body</testcase>"
            rm -f "$out"
        done
    fi
    echo "::endgroup::"
    printf '<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name="%s" tests="%d" failures="%d">%s</testsuite>\n' \
        "$pkg" "$tests" "$failures" "$cases" > "$results/$pkg.xml"
done
exit $any_failed
