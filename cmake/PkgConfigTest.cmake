# Test: a program built only from `pkg-config --cflags --libs lgmalloc` (and, statically,
# from `pkg-config --static --libs`) against the installed prefix PREFIX, then run.
# The program reports where lg_malloc came from; the shared build must resolve it in
# PREFIX/LIBDIR (through the .pc file's ${pcfiledir}-relative paths), the static one
# in the executable itself.
cmake_minimum_required(VERSION 3.20)
foreach(var IN ITEMS PKG_CONFIG CC PREFIX LIBDIR VERSION SOURCE WORK_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "PkgConfigTest.cmake: -D${var}=... is required")
  endif()
endforeach()

set(ENV{PKG_CONFIG_PATH} "${PREFIX}/${LIBDIR}/pkgconfig")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(run out)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE o ERROR_VARIABLE e
                  OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "FAIL: `${cmd}` exited with ${rc}\n${o}\n${e}")
  endif()
  set(${out} "${o}" PARENT_SCOPE)
endfunction()

run(modversion "${PKG_CONFIG}" --modversion lgmalloc)
if(NOT modversion STREQUAL VERSION)
  message(FATAL_ERROR "FAIL: pkg-config --modversion lgmalloc = ${modversion}, expected ${VERSION}")
endif()
run(pc_libdir "${PKG_CONFIG}" --variable=libdir lgmalloc)
file(REAL_PATH "${pc_libdir}" pc_libdir_real)
file(REAL_PATH "${PREFIX}/${LIBDIR}" want_libdir)
if(NOT pc_libdir_real STREQUAL want_libdir)
  message(FATAL_ERROR "FAIL: pkg-config libdir ${pc_libdir} is not ${want_libdir}")
endif()

run(cflags "${PKG_CONFIG}" --cflags lgmalloc)
run(libs "${PKG_CONFIG}" --libs lgmalloc)
message(STATUS "pkg-config --cflags --libs lgmalloc: ${cflags} ${libs}")
separate_arguments(cflags UNIX_COMMAND "${cflags}")
separate_arguments(libs UNIX_COMMAND "${libs}")

# Shared: exactly what the .pc file says, plus an rpath so it runs without LD_LIBRARY_PATH.
set(exe "${WORK_DIR}/pc_consumer_shared")
run(ignored "${CC}" -o "${exe}" "${SOURCE}" ${cflags} ${libs} "-Wl,-rpath,${pc_libdir}")
run(output "${exe}" "${VERSION}")
message(STATUS "${exe}: ${output}")
if(NOT output MATCHES "lg_malloc from: ([^\n]*)")
  message(FATAL_ERROR "FAIL: ${exe} did not report where lg_malloc came from")
endif()
get_filename_component(from_dir "${CMAKE_MATCH_1}" DIRECTORY)
file(REAL_PATH "${from_dir}" from_dir)
if(NOT from_dir STREQUAL want_libdir)
  message(FATAL_ERROR "FAIL: shared consumer took lg_malloc from ${from_dir}, not ${want_libdir}")
endif()

# Static: the archive from libdir, then Libs.private.
run(static_libs "${PKG_CONFIG}" --static --libs-only-l lgmalloc)
separate_arguments(static_libs UNIX_COMMAND "${static_libs}")
list(REMOVE_ITEM static_libs -llgmalloc)
if(static_libs STREQUAL "")
  message(FATAL_ERROR "FAIL: pkg-config --static --libs-only-l lgmalloc lists no native libs")
endif()
set(exe "${WORK_DIR}/pc_consumer_static")
run(ignored "${CC}" -o "${exe}" "${SOURCE}" ${cflags} "${pc_libdir}/liblgmalloc.a" ${static_libs})
run(output "${exe}" "${VERSION}")
message(STATUS "${exe}: ${output}")
if(output MATCHES "lg_malloc from: [^\n]*liblgmalloc\\.so")
  message(FATAL_ERROR "FAIL: the static consumer took lg_malloc from a shared library")
endif()
message(STATUS "pkg-config consumers (shared and static) against ${PREFIX}: passed")
