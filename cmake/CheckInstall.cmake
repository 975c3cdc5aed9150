# Test: the layout of an installed lgmalloc prefix.
#   lib/liblgmalloc.so.X.Y.Z with DT_SONAME liblgmalloc.so.X and no RPATH/RUNPATH,
#   lib/liblgmalloc.so.X -> liblgmalloc.so.X.Y.Z, lib/liblgmalloc.so -> liblgmalloc.so.X,
#   lib/liblgmalloc.a, include/lgmalloc.h (same as the source tree's),
#   lib/cmake/lgmalloc/{lgmalloc-config,lgmalloc-config-version,lgmalloc-native-libs}.cmake,
#   lib/pkgconfig/lgmalloc.pc, bin/lgmalloc-run when the source tree has scripts/lgmalloc-run;
#   the lg_* API exported by both libraries, malloc & co. exported exactly when OVERRIDE;
#   no absolute path of the prefix or the build tree in the package files (relocatable).
cmake_minimum_required(VERSION 3.20)
foreach(var IN ITEMS PREFIX SOURCE_DIR BUILD_DIR LIBDIR INCLUDEDIR BINDIR VERSION SONAME
                     OVERRIDE READELF NM)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "CheckInstall.cmake: -D${var}=... is required")
  endif()
endforeach()

set(failures "")
macro(fail msg)
  message(SEND_ERROR "FAIL: ${msg}")
  list(APPEND failures "${msg}")
endmacro()

set(lib "${PREFIX}/${LIBDIR}")
set(real "liblgmalloc.so.${VERSION}")

# Files and symlinks.
foreach(f IN ITEMS "${lib}/${real}" "${lib}/liblgmalloc.a" "${PREFIX}/${INCLUDEDIR}/lgmalloc.h"
                   "${lib}/cmake/lgmalloc/lgmalloc-config.cmake"
                   "${lib}/cmake/lgmalloc/lgmalloc-config-version.cmake"
                   "${lib}/cmake/lgmalloc/lgmalloc-native-libs.cmake"
                   "${lib}/pkgconfig/lgmalloc.pc")
  if(NOT EXISTS "${f}" OR IS_SYMLINK "${f}" OR IS_DIRECTORY "${f}")
    fail("missing regular file ${f}")
  endif()
endforeach()
foreach(pair IN ITEMS "${SONAME}=${real}" "liblgmalloc.so=${SONAME}")
  string(REPLACE "=" ";" pair "${pair}")
  list(GET pair 0 link)
  list(GET pair 1 want)
  if(NOT IS_SYMLINK "${lib}/${link}")
    fail("${lib}/${link} is not a symlink")
  else()
    file(READ_SYMLINK "${lib}/${link}" got)
    if(NOT got STREQUAL want)
      fail("${lib}/${link} -> ${got}, expected -> ${want}")
    endif()
  endif()
endforeach()

# Header identical to the committed one.
if(EXISTS "${PREFIX}/${INCLUDEDIR}/lgmalloc.h")
  file(SHA256 "${PREFIX}/${INCLUDEDIR}/lgmalloc.h" h_inst)
  file(SHA256 "${SOURCE_DIR}/include/lgmalloc.h" h_src)
  if(NOT h_inst STREQUAL h_src)
    fail("installed lgmalloc.h differs from ${SOURCE_DIR}/include/lgmalloc.h")
  endif()
endif()

# Launcher script.
if(EXISTS "${SOURCE_DIR}/scripts/lgmalloc-run")
  set(run "${PREFIX}/${BINDIR}/lgmalloc-run")
  if(NOT EXISTS "${run}")
    fail("scripts/lgmalloc-run exists but ${run} was not installed")
  else()
    execute_process(COMMAND test -x "${run}" RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
      fail("${run} is not executable")
    endif()
  endif()
endif()

# Dynamic section of the shared library.
if(EXISTS "${lib}/${real}")
  execute_process(COMMAND "${READELF}" -d "${lib}/${real}"
                  OUTPUT_VARIABLE dyn RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    fail("readelf -d ${real} failed")
  endif()
  if(NOT dyn MATCHES "\\(SONAME\\)[^\n]*\\[([^]\n]*)\\]")
    fail("${real} has no DT_SONAME")
  elseif(NOT CMAKE_MATCH_1 STREQUAL SONAME)
    fail("${real} has DT_SONAME ${CMAKE_MATCH_1}, expected ${SONAME}")
  endif()
  if(dyn MATCHES "\\((RPATH|RUNPATH)\\)")
    fail("${real} carries an ${CMAKE_MATCH_1}")
  endif()
endif()

# Exported symbols.
function(defined_symbols out)
  execute_process(COMMAND "${NM}" ${ARGN} OUTPUT_VARIABLE text RESULT_VARIABLE rc
                  ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(SEND_ERROR "FAIL: nm ${ARGN} failed: ${err}")
  endif()
  # "<addr> T name[@@VERSION]" -> name
  string(REGEX MATCHALL "[0-9a-fA-F]+ [TtWwiDdBbVv] [^\n@]+" lines "${text}")
  set(names "")
  foreach(l IN LISTS lines)
    string(REGEX REPLACE "^[0-9a-fA-F]+ . " "" n "${l}")
    list(APPEND names "${n}")
  endforeach()
  set(${out} "${names}" PARENT_SCOPE)
endfunction()

set(api lg_malloc lg_calloc lg_realloc lg_free lg_free_sized lg_aligned_alloc
        lg_posix_memalign lg_usable_size lg_stats lg_trim lg_version)
set(override_syms malloc free calloc realloc posix_memalign aligned_alloc memalign valloc
                  pvalloc malloc_usable_size _Znwm _ZdlPv _Znam _ZdaPv)
if(EXISTS "${lib}/${real}" AND EXISTS "${lib}/liblgmalloc.a")
  defined_symbols(so_syms -D --defined-only "${lib}/${real}")
  defined_symbols(a_syms -g --defined-only "${lib}/liblgmalloc.a")
  foreach(kind IN ITEMS so a)
    foreach(s IN LISTS api)
      if(NOT s IN_LIST ${kind}_syms)
        fail("${s} is not defined by the installed ${kind} library")
      endif()
    endforeach()
    foreach(s IN LISTS override_syms)
      if(OVERRIDE AND NOT s IN_LIST ${kind}_syms)
        fail("LGMALLOC_OVERRIDE=ON but ${s} is not defined by the ${kind} library")
      elseif(NOT OVERRIDE AND s IN_LIST ${kind}_syms)
        fail("LGMALLOC_OVERRIDE=OFF but the ${kind} library defines ${s}")
      endif()
    endforeach()
  endforeach()
endif()

# Relocatable package files: no absolute path of this prefix or the build tree.
foreach(f IN ITEMS "${lib}/cmake/lgmalloc/lgmalloc-config.cmake"
                   "${lib}/cmake/lgmalloc/lgmalloc-native-libs.cmake"
                   "${lib}/pkgconfig/lgmalloc.pc")
  if(EXISTS "${f}")
    file(READ "${f}" text)
    foreach(p IN ITEMS "${PREFIX}" "${BUILD_DIR}" "${SOURCE_DIR}")
      string(FIND "${text}" "${p}" at)
      if(NOT at EQUAL -1)
        fail("${f} contains the absolute path ${p}")
      endif()
    endforeach()
  endif()
endforeach()
if(EXISTS "${lib}/pkgconfig/lgmalloc.pc")
  file(STRINGS "${lib}/pkgconfig/lgmalloc.pc" pc_prefix REGEX "^prefix=")
  if(NOT pc_prefix MATCHES "^prefix=\\\${pcfiledir}/")
    fail("lgmalloc.pc prefix is not relative to \${pcfiledir}: ${pc_prefix}")
  endif()
  file(STRINGS "${lib}/pkgconfig/lgmalloc.pc" pc_private REGEX "^Libs.private:")
  if(NOT pc_private MATCHES "-l")
    fail("lgmalloc.pc has no native libraries in Libs.private: ${pc_private}")
  endif()
endif()

list(LENGTH failures n)
if(n GREATER 0)
  message(FATAL_ERROR "${n} install layout check(s) failed")
endif()
message(STATUS "install layout of ${PREFIX}: all checks passed")
