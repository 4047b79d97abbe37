echo "this one passes"
