echo "this test demonstrates a failure"
exit 1
