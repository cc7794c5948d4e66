CMakeFiles/nextron.dir/src/core/parallel_for.cpp.o: \
 /work/main/src/core/parallel_for.cpp /usr/include/stdc-predef.h \
 /work/main/src/core/parallel_for.h \
 /usr/lib/gcc/x86_64-linux-gnu/12/include/omp.h
