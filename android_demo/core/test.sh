#!/usr/bin/env bash
# Compile the plain Kotlin/JVM core module with kotlinc and run its JUnit 4 tests against the shared test
# vectors (src/test/resources/vectors, written by `tests/export/helpers/export_vectors.py`).
#
# Toolchain: Debian's kotlin (kotlinc 1.3.31), openjdk-17-jdk and junit4. Installed with apt-get when
# kotlinc is missing and we are root; otherwise a clear error. Ends with "N passed, M failed"; exits
# non-zero when a test fails or nothing ran.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

need=(kotlinc java)
missing=0
for t in "${need[@]}"; do command -v "$t" >/dev/null 2>&1 || missing=1; done
[ -f /usr/share/java/junit4.jar ] || missing=1
if [ "$missing" = 1 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing the JVM toolchain (apt-get install kotlin openjdk-17-jdk junit4) =="
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq kotlin openjdk-17-jdk junit4 >/dev/null
  else
    echo "error: kotlinc, java and /usr/share/java/junit4.jar are needed; install them with" >&2
    echo "  sudo apt-get install -y kotlin openjdk-17-jdk junit4   (Debian/Ubuntu)" >&2
    exit 2
  fi
fi

# kotlinc 1.3 crashes on JDKs newer than 17: prefer JDK 17 when it is there.
if [ -x /usr/lib/jvm/java-17-openjdk-amd64/bin/java ]; then
  export JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64
elif [ -x /usr/lib/jvm/java-17-openjdk-arm64/bin/java ]; then
  export JAVA_HOME=/usr/lib/jvm/java-17-openjdk-arm64
fi
java_bin="${JAVA_HOME:+$JAVA_HOME/bin/}java"

J=/usr/share/java
cp_test="$J/junit4.jar:$J/hamcrest-core.jar"
out="$here/build/test-sh"
rm -rf "$out"
mkdir -p "$out"

echo "== kotlinc (main + test sources) =="
# -jvm-target 1.8: what Android consumes; one kotlinc run for both source sets (kotlinc starts slowly)
kotlinc -jvm-target 1.8 -nowarn -cp "$cp_test" -d "$out/classes" src/main/kotlin src/test/kotlin 2>&1 \
  | grep -v -e 'Options -Xverify:none and -noverify were deprecated' || true
[ -f "$out/classes/org/alignkd/core/TestMain.class" ] || { echo "compilation failed"; echo "0 passed, 1 failed"; exit 1; }

echo "== junit =="
"$java_bin" -Dvectors.dir="$here/src/test/resources/vectors" \
  -cp "$out/classes:$cp_test:$J/kotlin-stdlib.jar" org.alignkd.core.TestMain
