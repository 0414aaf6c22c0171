NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
timeout 240 "$NCU" --clock-control none -k regex:'dp_' --launch-skip 8 --launch-count 8 \
  --section SpeedOfLight --section WarpStateStats --section SourceCounters --section LaunchStats \
  --section Occupancy --section MemoryWorkloadAnalysis -f -o /tmp/op python3 .probe/ncu_op.py \
  > "$OUT/ncu_op_run.txt" 2>&1
tail -12 "$OUT/ncu_op_run.txt"
"$NCU" -i /tmp/op.ncu-rep --page details > "$OUT/ncu_op_details.txt" 2>&1
"$NCU" -i /tmp/op.ncu-rep --page source --print-source sass --csv > "$OUT/ncu_op_source.csv" 2>&1
gzip -f "$OUT/ncu_op_source.csv"
grep -E "^  dp_|Duration|Registers Per|Dynamic Shared|Memory Throughput  |Compute \(SM\) Throughput|Achieved Occupancy" "$OUT/ncu_op_details.txt"
